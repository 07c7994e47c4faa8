"""The domain's signal receivers."""

from django.db import transaction
from django.db.models.signals import post_delete
from django.dispatch import receiver

from agents_app.domain.services import attachment_files_delete


@receiver(post_delete, sender="agents_app.Attachment")
def delete_attachment_files(sender, instance, **kwargs) -> None:
    """An attachment's file goes with its row, however the row went: a deleted conversation (by its owner or an
    admin), a deleted user. After the commit, so a rolled-back delete keeps its file."""
    name = instance.file.name
    if name:
        transaction.on_commit(lambda: attachment_files_delete([name]))
