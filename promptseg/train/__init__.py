"""Training: `common` (config, COCO data, optimiser), one module per family that trains
(`sine`, `diffews`), each registering its entry point with `@register_trainer`."""
