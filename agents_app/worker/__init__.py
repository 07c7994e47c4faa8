"""The agent worker: claims runs, drives the runner, stores and publishes what it produces."""
