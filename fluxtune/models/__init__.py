"""The model side: one module per FLUX family behind one interface (`families/`), and what is
done to a base model to fit a card: quantization, block offload, FSDP sharding; its memory
arithmetic for the planner; the tiny offline models tests and the demo run on.

Imports nothing of the other stages (only `fluxtune.errors`): every other stage builds on it.
"""
