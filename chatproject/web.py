"""Run daphne on Chorus's event loop: `python -m chatproject.web [daphne's options] chatproject.asgi:application`.

The options are daphne's own, unchanged. daphne creates its event loop when it is imported, so the loop
policy (chatproject/eventloop.py) is set first, here, rather than in the ASGI application.
"""

import sys

from chatproject import eventloop

print(f"chatproject.web: daphne on the {eventloop.install()} event loop", file=sys.stderr, flush=True)

from daphne.cli import CommandLineInterface  # noqa: E402  (after the policy: daphne makes its loop on import)

if __name__ == "__main__":
    CommandLineInterface.entrypoint()
