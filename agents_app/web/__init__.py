"""The web tier: pages, the WebSocket consumer, Server-Sent Events, the JSON API and AG-UI.
Imports the domain, never the runner or AutoGen."""
