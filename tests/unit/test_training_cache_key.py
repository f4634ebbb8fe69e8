"""The latent cache is keyed by the weights that encoded it, not only by the model's name."""

from __future__ import annotations

import torch

from selma.pipelines import ModelSpec, load_pipeline
from selma_training.data import model_fingerprint


def test_the_fingerprint_follows_the_encoding_weights_and_nothing_else(make_settings):
    pipe = load_pipeline(ModelSpec("tiny://sd"), make_settings(), device="cpu")
    first = model_fingerprint(pipe)
    assert model_fingerprint(pipe) == first  # deterministic
    with torch.no_grad():
        pipe.unet.conv_in.weight.add_(1.0)  # what the cache does not hold: the UNet, the decoder
        pipe.vae.decoder.conv_in.weight.add_(1.0)
    assert model_fingerprint(pipe) == first
    with torch.no_grad():
        pipe.vae.quant_conv.bias[-1] = -30.0  # the posterior's std (a folded encoder, say)
    folded = model_fingerprint(pipe)
    assert folded != first
    with torch.no_grad():
        next(pipe.text_encoder.parameters()).add_(1e-3)  # the prompts' embeddings
    assert model_fingerprint(pipe) not in (first, folded)
