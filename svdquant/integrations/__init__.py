"""Integrations with other libraries' plug-in APIs.

* :mod:`.diffusers` — svdquant as a diffusers quantization backend (``quant_method: "svdquant"``), and in
  :mod:`.diffusers.compat` every use of diffusers' internals, with the tested version range;
* :mod:`.transformers` — svdquant as a transformers quantization backend (quantized text encoders save with
  ``save_pretrained`` and load with ``from_pretrained``), with its version check in :mod:`.transformers.compat`;
* :mod:`.quantization_config` — the entries both backends' ``quantization_config`` hold, checked once;
* :mod:`.diffusers_quantizer` — the older import path of ``attach`` and the backend's classes.
"""
