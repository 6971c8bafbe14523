"""One module per component role (text_encoder, unet, vae): contract, loading, wrapper, eager reference.

Nothing is imported here, so importing a component module never runs another's code (no cycle through the package).
"""
