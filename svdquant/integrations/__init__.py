"""Integrations with other libraries' plug-in APIs.

* :mod:`.diffusers` — svdquant as a diffusers quantization backend (``quant_method: "svdquant"``), and in
  :mod:`.diffusers.compat` every use of diffusers' internals, with the tested version range;
* :mod:`.diffusers_quantizer` — the older import path of ``attach`` and the backend's classes.
"""
