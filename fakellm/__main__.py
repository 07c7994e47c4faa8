"""``python -m fakellm``: run the offline model server without Django.

Example: ``python -m fakellm --host 127.0.0.1 --port 8001 --tps 30 --script rules.json``.
"""

import argparse

from fakellm.server import add_arguments, config_from_options, serve


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m fakellm", description="Chorus's offline OpenAI-compatible model server."
    )
    add_arguments(parser)
    options = vars(parser.parse_args(argv))
    try:
        config = config_from_options(options)
    except (OSError, ValueError) as exc:
        parser.error(f"--script {options['script']}: {exc}")
    serve(options["host"], options["port"], config)


if __name__ == "__main__":
    main()
