"""The models a build starts from: the offline presets (`presets`: tiny random-weight LLaVA-1.5 and
LLaVA-NeXT; `real_presets`: SmolLM2-135M behind the tiny CLIP) and the checks of a user's checkpoint
directory (`checkpoint`). Imports torch and transformers."""
