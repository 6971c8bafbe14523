"""Conformance with optimum-neuron 0.4.5, judged by its own code run in a separate virtualenv.

setup_env.sh makes the venv, optimum_runner.py runs inside it, venv.py (stdlib only) calls it from our tests,
calls.py reads the torch_neuronx test double's record. See venv.py for the API.
"""
