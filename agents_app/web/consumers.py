"""The chat WebSocket (protocol v1, docs/protocol.md): checks who is asking, calls services, forwards events."""

import json
import logging
import time
from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings

from agents_app.domain import events, human_input, selectors, services
from agents_app.domain.services import ChatError
from agents_app.domain.validation import parse_seq
from agents_app.ops import logs, metrics
from agents_app.realtime import fanout
from agents_app.realtime.announce import encode
from agents_app.realtime.dispatch import DirectDispatch
from agents_app.web import session_watch, tokens
from agents_app.web.replay import replay_after
from agents_app.web.session_watch import SessionRef
from agents_app.web.signals import session_group

logger = logging.getLogger(__name__)

CLOSE_UNAUTHENTICATED = 4401
CLOSE_NOT_FOUND = 4404
CLOSE_TOO_MANY_FRAMES = 4429
FRAME_BURST = 30  # frames a socket may send at once...
FRAMES_PER_SECOND = 2.0  # ...and on average; a person's page sends one per message or Stop
REPLAY_COST = 10  # a resume frame counts as this many


class FrameAllowance:
    """A token bucket: FRAME_BURST frames at once, FRAMES_PER_SECOND on average."""

    def __init__(self) -> None:
        self.tokens = float(FRAME_BURST)
        self.at = time.monotonic()

    def take(self, cost: float) -> bool:
        now = time.monotonic()
        self.tokens = min(FRAME_BURST, self.tokens + (now - self.at) * FRAMES_PER_SECOND)
        self.at = now
        if self.tokens < cost:
            return False
        self.tokens -= cost
        return True


class SessionEnded(Exception):
    """The socket's session no longer logs its user in: the socket closes with 4401."""


class ChatConsumer(DirectDispatch, AsyncWebsocketConsumer):
    session_ref: SessionRef | None = None
    read_only = False  # opened with a read-only API token: it reads, it does not send or stop
    session_over = False  # set when the session ended: the socket is closing and sends nothing more
    counted = False  # in chorus_websockets_open

    async def connect(self) -> None:
        user = self.scope["user"]
        conversation_id = self.scope["url_route"]["kwargs"]["conversation_id"]
        self.conversation = await database_sync_to_async(selectors.conversation_for_user)(
            user=user, conversation_id=conversation_id
        )
        if self.conversation is None:
            # Closing before accept refuses the handshake (HTTP 403): anonymous and strangers alike.
            await self.close(code=CLOSE_UNAUTHENTICATED if not user.is_authenticated else CLOSE_NOT_FOUND)
            return
        token = self.scope.get("chorus.api_token")  # a program's socket (tokens.BearerTokenRouter)
        if token is not None:
            self.read_only = token.read_only
            self.session_group = tokens.token_group(token.id)  # a revocation closes it, in every process
            self.session_ref = tokens.token_ref(token)
        else:
            self.session_group = session_group(self.scope["session"].session_key)
            self.session_ref = SessionRef.of(self.scope["session"], user)
        await self.channel_layer.group_add(self.session_group, self.channel_name)
        # However else the session ends (expiry, a password change, the user deactivated...): session_watch.py.
        session_watch.watch(self.session_ref, self)
        self.fanout = fanout.backend()
        self.frames = FrameAllowance()
        self.last_sent_seq = 0
        # Events that arrive while hello or a resume is being sent wait here, then go out in seq order.
        self.held: list[tuple[int, str]] | None = []
        await self.fanout.subscribe(self.conversation.id, self)
        await self.accept()
        # This socket's task: every line logged about it names the conversation and the person.
        logs.bind(conversation_id=self.conversation.id, user_id=user.pk)
        self.counted = True
        metrics.WEBSOCKETS_OPEN.inc()
        metrics.WEBSOCKET_CONNECTIONS.inc()
        hello = await database_sync_to_async(self._hello)()
        # The database knows the stored events; the log also knows the tokens of a message still being written.
        logged = await self.fanout.last_logged_seq(self.conversation.id)
        if logged > hello["last_seq"]:
            hello["seq"] = hello["last_seq"] = logged
        await self._send_text(encode(hello))
        self.last_sent_seq = hello["last_seq"]
        try:
            after_seq = self._after_seq_from_query()
        except ChatError as exc:  # a bad ?after_seq=: said once; the socket goes on, without a replay
            after_seq = None
            await self._send_text(encode(events.error_event(exc.code, exc.detail)))
        if after_seq is None:
            await self._release_held()
        else:
            # A reconnecting client names its last seq in the URL: the replay comes before any live event.
            await self._replay(after_seq)

    def _after_seq_from_query(self) -> int | None:
        """The URL's `?after_seq=`, or None without one; ChatError `invalid_after_seq` for a bad one."""
        query = parse_qs(self.scope.get("query_string", b"").decode(errors="replace"), keep_blank_values=True)
        if "after_seq" not in query:
            return None
        after_seq = parse_seq(query["after_seq"][0])
        if after_seq is None:
            raise ChatError("invalid_after_seq", "?after_seq= must be a whole number from 0 to 2**63 - 1.")
        return after_seq

    def _hello(self) -> dict:
        self.conversation.refresh_from_db(fields=["last_seq"])
        active = selectors.run_active_for_conversation(conversation_id=self.conversation.id)
        return events.hello_event(self.conversation, active.id if active else None)

    async def disconnect(self, code) -> None:
        if self.counted:
            self.counted = False
            metrics.WEBSOCKETS_OPEN.dec()
        if self.session_ref is not None:
            session_watch.unwatch(self.session_ref, self)
        if getattr(self, "fanout", None) is not None:
            await self.fanout.unsubscribe(self.conversation.id, self)
        if getattr(self, "session_group", None):
            try:
                await self.channel_layer.group_discard(self.session_group, self.channel_name)
            except Exception:  # the membership expires by itself; a closing socket has nothing to lose
                logger.warning("leaving %s failed", self.session_group, exc_info=True)

    async def session_ended(self, message=None) -> None:
        """This socket's session is gone: a logout (in this tab or another; a message of the session's group),
        or the session watch found it ended, or a frame that starts work found it ended."""
        if self.session_over:
            return
        self.session_over = True
        session_watch.unwatch(self.session_ref, self)
        await self.close(code=CLOSE_UNAUTHENTICATED)

    async def receive(self, text_data=None, bytes_data=None) -> None:
        if self.session_over:
            return
        if not self.frames.take(1):
            # Far more frames than a page sends: a flood, or a client that sends while never reading (which
            # daphne's keepalive then never drops). Either way the socket goes; a real page reconnects.
            await self._send_text(encode(events.error_event(
                "too_many_frames", "This socket sent too many frames too fast and is closed.")))  # fmt: skip
            await self.close(code=CLOSE_TOO_MANY_FRAMES)
            return
        try:
            frame = self._parse(text_data, bytes_data)
            handler = {"send": self.on_send, "cancel": self.on_cancel, "resume": self.on_resume,
                       "input.response": self.on_input_response}.get(frame["type"])  # fmt: skip
            if handler is None:
                raise ChatError(
                    "unknown_type",
                    f"Unknown frame type {frame['type'][:40]!r}: use send, cancel, resume or input.response.",
                )
            await handler(frame)
        except ChatError as exc:
            await self._send_text(encode(events.error_event(exc.code, exc.detail)))
        except SessionEnded:
            await self.session_ended()

    def _parse(self, text_data, bytes_data) -> dict:
        if text_data is None:
            raise ChatError("binary_not_supported", "Frames are JSON text, not binary.")
        if (
            len(text_data) > settings.CHORUS_MAX_FRAME_BYTES
            or len(text_data.encode()) > settings.CHORUS_MAX_FRAME_BYTES
        ):
            raise ChatError("frame_too_large", f"Frames are limited to {settings.CHORUS_MAX_FRAME_BYTES} bytes.")
        try:
            frame = json.loads(text_data)
        except (ValueError, RecursionError):
            raise ChatError("invalid_json", "The frame is not valid JSON.") from None
        if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
            raise ChatError("invalid_frame", 'A frame is a JSON object with a "type".')
        return frame

    async def on_send(self, frame: dict) -> None:
        content = frame.get("content")
        if not isinstance(content, str):
            raise ChatError("invalid_frame", '"content" must be a string.')
        # The person's activity is checked inside message_send, with the lock it takes on their row: no query of
        # its own on the path of every message (the session itself is checked every CHORUS_SESSION_CHECK_SECONDS).
        try:
            await database_sync_to_async(self._while_logged_in)(
                services.message_send, check_session=False,
                conversation=self.conversation, content=content, client_id=frame.get("client_id"),
                attachments=frame.get("attachments"),
            )  # fmt: skip
        except ChatError as exc:
            if exc.code == services.ACCOUNT_INACTIVE:
                raise SessionEnded from None
            raise

    async def on_cancel(self, frame: dict) -> None:
        run_id = frame.get("run_id")
        if run_id is not None and not isinstance(run_id, str):
            raise ChatError("invalid_frame", '"run_id" must be a string.')
        await database_sync_to_async(self._while_logged_in)(
            services.run_cancel, conversation=self.conversation, run_id=run_id
        )

    async def on_input_response(self, frame: dict) -> None:
        request_id, content = frame.get("request_id"), frame.get("content")
        if not isinstance(request_id, str) or not isinstance(content, str):
            raise ChatError("invalid_frame", '"request_id" and "content" must be strings.')
        await database_sync_to_async(self._while_logged_in)(self._answer, request_id=request_id, content=content)

    def _answer(self, *, request_id: str, content: str) -> None:
        human_input.input_answer(
            conversation=self.conversation, user=self.conversation.owner, request_id=request_id, content=content
        )

    def _while_logged_in(self, work, check_session: bool = True, **kwargs):
        """Runs `work` if the session still logs its user in, checked now (in the same trip to the database
        thread), not at the next session check: a deactivated user's frame starts nothing. Without
        `check_session`, `work` checks the person itself."""
        # A program's socket checks its API token on every frame that starts work (one indexed query): a revoked
        # token is refused at once, not at the next check.
        by_token = isinstance(self.session_ref, tokens.TokenRef)
        if (check_session or by_token) and not session_watch.session_alive(self.session_ref):
            raise SessionEnded
        if self.read_only:
            raise ChatError("read_only_token", "This API token is read-only: it cannot send or stop answers.")
        return work(**kwargs)

    async def on_resume(self, frame: dict) -> None:
        after_seq = frame.get("after_seq")
        if not isinstance(after_seq, int) or parse_seq(after_seq) is None:
            raise ChatError("invalid_frame", '"after_seq" must be an integer from 0 to 2**63 - 1.')
        # A replay can be the whole conversation, queued at once: it costs a socket many frames' worth.
        if not self.frames.take(REPLAY_COST):
            raise ChatError("too_many_resumes", "Too many resume requests; reconnect with ?after_seq= instead.")
        self.held = []
        await self._replay(after_seq)

    async def _replay(self, after_seq: int) -> None:
        """Send every event with seq > after_seq in order (even ones sent live before: they were asked for
        again), then the live events held meanwhile, each once."""
        try:
            replay = await replay_after(self.conversation, after_seq)
            for _seq, text in replay:
                await self._send_text(text)
            self.last_sent_seq = max([after_seq, self.last_sent_seq, *(seq for seq, _ in replay)])
        finally:
            await self._release_held()

    async def deliver(self, seq: int, text: str) -> None:
        """An event of this conversation from the fan-out: sent once, in seq order."""
        if self.held is not None:
            self.held.append((seq, text))
        elif seq > self.last_sent_seq:
            self.last_sent_seq = seq
            # Once per token per socket: the cheapest way this server has to send a frame (routing.py).
            await self._send_text(text)

    async def _send_text(self, text: str) -> None:
        if self.session_over:
            return  # closing: nothing more of the conversation goes out
        send_text = self.scope.get("chorus.send_text")
        if send_text is None:
            await self.send(text_data=text)
        else:
            await send_text(text)

    async def catch_up(self) -> None:
        """The fan-out lost Redis for a while: send what this socket missed meanwhile, from the log."""
        if self.held is not None:
            return  # a replay is under way; it ends with everything held
        self.held = []
        try:
            await self._replay(self.last_sent_seq)
        except Exception:
            logger.warning("catching up conversation %s failed", self.conversation.id, exc_info=True)

    async def _release_held(self) -> None:
        held, self.held = self.held or [], None
        for seq, text in sorted(held):
            if seq > self.last_sent_seq:
                self.last_sent_seq = seq
                await self._send_text(text)
