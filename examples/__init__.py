"""Example models (plain torch, Hugging Face, pretrained SmolLM2) and demos for fxforge."""
