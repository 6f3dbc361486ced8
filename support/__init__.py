"""Support a reader of the method can skip: checkpoints, code sets and datasets, processes, the
command-line edge, files, images, and the pretrained tokenizers."""
