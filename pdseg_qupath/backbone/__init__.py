"""PathSegDiff's latent-diffusion backbone on diffusers, used as a frozen feature extractor.

Modules (imported on demand; diffusers is heavy to import):
``config`` named architectures · ``model`` Backbone, build/save/load_backbone, describe ·
``features`` LDMFeatures · ``convert`` original checkpoint -> diffusers folder · ``hub`` Hugging Face
specs · ``bench`` bench_features · ``taps`` hook-free UNet walk · ``noise`` position-keyed noise ·
``conditioning`` SSL / ZoomLDM embedders.
"""
