"""``python manage.py fakellm``: run Chorus's offline OpenAI-compatible model server.

A thin wrapper: the server lives in ``fakellm`` and also runs without Django
(``python -m fakellm``); the options are the same.
"""

from django.core.management.base import BaseCommand, CommandError

from fakellm.server import add_arguments, config_from_options, serve


class Command(BaseCommand):
    help = "Run the offline OpenAI-compatible model server used by the tests, the demo mode and benchmarks."

    def add_arguments(self, parser):
        add_arguments(parser)

    def handle(self, *args, **options):
        try:
            config = config_from_options(options)
        except (OSError, ValueError) as exc:
            raise CommandError(f"--script {options['script']}: {exc}") from exc
        serve(options["host"], options["port"], config)
