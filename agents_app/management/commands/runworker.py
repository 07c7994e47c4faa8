"""`manage.py runworker agent-runs`, with Chorus's worker loop (see agents_app.worker.process.ChorusWorker)."""

from channels.management.commands.runworker import Command as ChannelsRunworker

from agents_app.worker.process import ChorusWorker
from chatproject import eventloop


class Command(ChannelsRunworker):
    worker_class = ChorusWorker

    def handle(self, *args, **options):
        # Before any loop exists: the worker's own loop and its agent loop's are both made from the policy.
        eventloop.install()
        return super().handle(*args, **options)
