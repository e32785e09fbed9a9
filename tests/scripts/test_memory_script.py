"""scripts/memory.py: LLaVA-1.5-7B's plan against numbers computed by hand, the device verdicts, errors."""

from __future__ import annotations

import json

import pytest

from scripts import memory

# LLaVA-1.5-7B by hand. Vicuna-7B: per layer q, k, v, o 4096 x 4096, gate / up / down 4096 x 11008, two RMSNorms;
# the shipped config's 32064-token table (llava-hf's padded vocabulary) in and out, one final norm.
LAYER = 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096  # 202,383,360
TABLE = 32064 * 4096
LLM = 32 * LAYER + 2 * TABLE + 4096  # 6,738,939,904: Vicuna-7B's 6.74e9
# CLIP ViT-L/14-336: class + conv 3x14x14 + 577 positions; per layer 4 (1024^2 + 1024), fc1, fc2, two LayerNorms;
# pre / post LayerNorm. The projector: 1024 -> 4096 -> 4096, both with bias.
CLIP_LAYER = 4 * (1024 * 1024 + 1024) + (1024 * 4096 + 4096) + (4096 * 1024 + 1024) + 2 * 2048
CLIP = 1024 + 3 * 1024 * 14 * 14 + 577 * 1024 + 24 * CLIP_LAYER + 2 * 2048  # 303,507,456: ~303M
PROJECTOR = 4096 * 1024 + 4096 + 4096 * 4096 + 4096  # 20,979,712
KV = 32 * 2 * 4096 * 2048 * 2  # 32 layers, K and V, 32 heads x 128, 2048 tokens, fp16: 1 GiB


def int4(fan_in: int, fan_out: int, bias: bool) -> int:
    """Half a byte per weight; per 32 inputs of a row an fp16 scale and a 4-bit zero point; an fp16 bias."""
    return fan_in * fan_out // 2 + fan_out * (fan_in // 32) * 5 // 2 + (2 * fan_out if bias else 0)


INT4_LAYER = 4 * int4(4096, 4096, False) + 2 * int4(4096, 11008, False) + int4(11008, 4096, False) + 2 * 4096 * 2
INT4_CLIP_LAYER = 4 * int4(1024, 1024, True) + int4(1024, 4096, True) + int4(4096, 1024, True) + 2 * 2048 * 2
INT4_VISION = (2 * (1024 + 3 * 1024 * 14 * 14 + 577 * 1024 + 2 * 2048) + 24 * INT4_CLIP_LAYER
               + int4(1024, 4096, True) + int4(4096, 4096, True))


def run(capsys, *args: str) -> dict:
    assert memory.main(["--model", "llava-1.5-7b", "--max-seq-len", "2048", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def activations(prompt: int) -> int:
    """The prefill estimate at fp16: one layer's residual-stream / MLP tensors and its unfused attention."""
    return prompt * (4096 + 11008) * 2 * 4 + 32 * prompt**2 * (4 + 2)


def test_the_hand_counts_are_the_published_sizes():
    assert LLM - 2 * 64 * 4096 == 6_738_415_616  # Llama-2-7B / Vicuna-7B with its 32000-token table
    assert CLIP == 303_507_456 and PROJECTOR == 20_979_712  # CLIPVisionModel ViT-L/14-336: 303.5M


def test_fp16_v_025_matches_the_hand_count_and_does_not_fit_the_orin_nano(capsys):
    plan = run(capsys, "--variant", "v", "--ratio", "0.25", "--weights", "fp16", "--prompt-len", "512")
    assert plan["weights"] == {"vision": 2 * (CLIP + PROJECTOR), "embed": 2 * TABLE, "decoder.0": 2 * (LLM - TABLE)}
    assert plan["kv_bytes"] == KV == 2**30 and plan["kv_capacities"] == [2048] * 32
    assert plan["visual_tokens"] == 144 and plan["language_steps"] == []
    assert plan["total"] == 2 * (CLIP + PROJECTOR + LLM) + KV + activations(512)
    verdicts = {d["name"]: d["fits"] for d in plan["devices"]}
    assert verdicts == {"Jetson Orin Nano 8 GB": False, "Jetson Orin NX 16 GB": False, "Jetson AGX Orin 32 GB": True,
                        "Jetson AGX Orin 64 GB": True, "Jetson Thor 128 GB": True, "RTX 4090 24 GB": True}


def test_int4_v_025_matches_the_hand_count_and_fits_the_orin_nano(capsys):
    """4.15 GiB of int4 weights + 1 GiB of fp16 KV fit the Orin Nano's 5.5 GiB with prompts up to 512 tokens
    (FiCoCo-V's 144 visual tokens and the text); a 2048-token prompt's unfused attention (0.75 GiB) does not."""
    plan = run(capsys, "--variant", "v", "--ratio", "0.25", "--weights", "int4", "--prompt-len", "512")
    weights = {"vision": INT4_VISION, "embed": 2 * TABLE, "decoder.0": 32 * INT4_LAYER + 2 * 4096 + 2 * TABLE}
    assert plan["weights"] == weights  # the final norm and lm_head stay fp16
    assert (plan["kv_bytes"], plan["activation_bytes"]) == (KV, activations(512))
    nano = plan["devices"][0]
    assert nano["name"] == "Jetson Orin Nano 8 GB" and nano["fits"]
    assert nano["free_after"] == 8 * 2**30 - int(2.5 * 2**30) - sum(weights.values()) - KV - activations(512) > 0
    full = run(capsys, "--variant", "v", "--ratio", "0.25", "--weights", "int4")  # prompt_len = max_seq_len
    assert full["activation_bytes"] == activations(2048) and not full["devices"][0]["fits"]
    assert full["devices"][1]["fits"]  # Orin NX 16 GB


def test_language_variant_shortens_later_caches(capsys):
    plan = run(capsys, "--variant", "l", "--ratio", "0.5", "--weights", "fp16")
    assert plan["language_steps"] == [{"layer": 4, "tokens_in": 576, "tokens_out": 288}]
    assert plan["kv_bytes"] == KV // 2048 // 32 * (5 * 2048 + 27 * 1760)
    assert sum(plan["weights"].values()) == 2 * (CLIP + PROJECTOR + LLM) and "decoder.1" in plan["weights"]


def test_text_output_has_the_plan_and_the_device_table(capsys):
    assert memory.main(["--variant", "none", "--weights", "int8"]) == 0
    out = capsys.readouterr().out
    assert "| **total** |" in out and "| RTX 4090 24 GB |" in out and "none, weights int8" in out


@pytest.mark.parametrize("args", [
    ["--variant", "v"],  # no amount
    ["--variant", "none", "--ratio", "0.5"],
    ["--weights", "int3", "--variant", "none"],
    ["--model", "no-such-model", "--variant", "none"],
    ["--variant", "v", "--ratio", "1.5"],
    ["--variant", "none", "--max-seq-len", "500"],  # shorter than the 576 visual tokens
    ["--variant", "none", "--grid", "2x2"],  # LLaVA-1.5 has no anyres grid
    ["--variant", "none", "--prompt-len", "4096"],  # longer than --max-seq-len
])
def test_bad_input_is_one_error_line_and_exit_2(capsys, args):
    assert memory.main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: ") and captured.err.count("\n") == 1
