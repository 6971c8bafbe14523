"""The file names an export is made of, defined once for every writer and reader."""

ARTIFACT_NAME = "model.neuron"  # each component's TorchScript module, the name optimum-neuron loads
COMPONENT_CONFIG = "config.json"  # each component's config with the `neuron` object
MANIFEST_NAME = "manifest.json"  # neuron-export's record of the export
