"""TEST DOUBLE of `neuronx_distributed.trace.hlo_utils` (written by us): the constant optimum reads."""

NXD_LAYOUT_TRANSFORMATION_OPTIONS = "NXD_LAYOUT_TRANSFORMATION_OPTIONS"
