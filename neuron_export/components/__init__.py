"""One module per component family (text_encoder, unet, vae): contract, loading, wrapper, eager reference.

Nothing is imported here, so importing a family module never runs another's code (no cycle through the package).
"""
