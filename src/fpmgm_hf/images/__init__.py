"""Image tooling: the VQ tokenizer's training / encoding CLI (`vq`) and class-conditional FP-MaskGIT training
(`train`). The VQ model files themselves (`configuration_vqvae.py`, `modeling_vqvae.py`) stay flat."""
