"""The FGTBT network in Flax Linen (NHWC): MiT backbone with FGSA prompts, SegFormer decoder."""
