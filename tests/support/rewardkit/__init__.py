"""Tiny random reward models of the real architectures, written in the real file formats into a temporary
``models/reward_models/`` folder, for tests that score through the production loaders."""
