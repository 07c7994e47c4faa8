"""`manage.py runworker agent-runs`, with Chorus's worker loop (see agents_app.worker.ChorusWorker)."""

from channels.management.commands.runworker import Command as ChannelsRunworker

from agents_app.worker import ChorusWorker


class Command(ChannelsRunworker):
    worker_class = ChorusWorker
