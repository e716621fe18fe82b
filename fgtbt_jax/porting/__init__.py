"""PyTorch release checkpoints ⇄ Flax variables: ``.pth`` I/O, the key table, pretrained loading."""
