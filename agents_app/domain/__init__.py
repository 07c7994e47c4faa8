"""The domain: models, the services that change them, the selectors that read them, protocol event payloads.
No transport, no AutoGen."""
