"""The frozen models: loading by hub id or directory and naming them by their bytes, the backbone
seam (SD 1.x/2.x), U-net taps, the noise rule, and tiny models in the real on-disk formats."""
