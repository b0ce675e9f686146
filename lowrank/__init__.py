"""lowrank: measure the intrinsic rank of fine-tuning updates (full fine-tuning vs LoRA)."""
