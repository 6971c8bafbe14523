from neuron_export.cli import main

main()
