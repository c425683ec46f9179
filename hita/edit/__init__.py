"""Zero-shot editing with a trained Hita: style transfer and in-painting, no training or fine-tuning.

What the paper (arXiv 2507.02358) states: the holistic tokens capture global image properties
(textures, materials, shapes), and a trained Hita does zero-shot style transfer and in-painting (its
application figure: a content image re-rendered in the look of a style image; the lower half of an
image masked and completed, compared with LlamaGen). The exact procedure is not spelled out in the
parts of the paper we could read, so the implementation here is our reading of those facts:

- style transfer: patch tokens (layout) of the content image + holistic tokens (global appearance)
  of the style image, decoded; optionally only some holistic slots;
- in-painting: the tokens of the visible part are kept and the class-conditional (or unconditional)
  GPT draws the tokens that carry the masked cells, in its raster order; holistic tokens are encoded
  from the visible part (default) or drawn by the GPT too.

This package holds the model-level parts (image and mask checks, token plans); ``hita.jobs.edit``
runs them through any runtime and writes the files.
"""
