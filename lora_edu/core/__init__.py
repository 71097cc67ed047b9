"""The LoRA core: layers (ΔW = s·B A), injection by name, merging with a measured equivalence check, counting."""
