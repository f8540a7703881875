"""`hotvm-email`: a Prefect notification block that sends e-mail over SMTP (smtplib), for automations.

Why a block of our own: Prefect 3.9 ships no SMTP notification block (the e-mail ones live in the separate
`prefect-email` collection, built on a different block model), and an automation's send-notification
action runs in the *server* process, which must know the block's class. This module is announced to
every Prefect process of hotvm's environment by the `prefect.collections` entry point in pyproject.toml,
so `prefect server start` from that environment (what `make server` runs) loads it and can send.

The password is a `SecretStr` field: kept in the block document (the UI and API show it masked), put
there by `hotvm notifications apply` from the environment variable `password_env` names, never logged.
"""

from __future__ import annotations

import asyncio
import smtplib
import ssl
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Literal

from prefect._internal.compatibility.async_dispatch import async_dispatch
from prefect.blocks.abstract import NotificationBlock, NotificationError
from pydantic import Field, SecretStr


class HotvmEmail(NotificationBlock):
    """E-mail over SMTP for hotvm's notifications (failed, crashed and late runs)."""

    _block_type_name = "hotvm e-mail"
    _block_type_slug = "hotvm-email"
    _description = "E-mail over SMTP (smtplib): hotvm's failed, crashed and late run notifications."

    smtp_host: str = Field(description="The SMTP server's host name or address.")
    smtp_port: int = Field(default=587, description="The SMTP server's port (25, 465, 587, ...).")
    security: Literal["starttls", "ssl", "none"] = Field(
        default="starttls",
        description="starttls: upgrade the connection (port 587); ssl: TLS from the start (port 465); "
        "none: plain text (a relay on loopback or in a trusted network only).",
    )
    sender: str = Field(description="The From address.")
    to: list[str] = Field(description="The recipients.")
    username: str | None = Field(default=None, description="SMTP login; empty: no login.")
    password: SecretStr | None = Field(default=None, description="SMTP password (kept masked).")
    timeout: float = Field(default=20, description="Seconds to wait for the SMTP server.")

    def _message(self, body: str, subject: str | None) -> EmailMessage:
        msg = EmailMessage()
        msg["From"] = self.sender
        msg["To"] = ", ".join(self.to)
        msg["Subject"] = (subject or "hotvm notification").replace("\r", " ").replace("\n", " ")
        msg["Date"] = formatdate(localtime=False)
        msg["Message-ID"] = make_msgid(domain="hotvm")
        msg.set_content(body)
        return msg

    def _send(self, body: str, subject: str | None) -> None:
        """One SMTP session; errors name the server, never the password."""
        context = ssl.create_default_context()
        try:
            if self.security == "ssl":
                smtp = smtplib.SMTP_SSL(self.smtp_host, self.smtp_port, timeout=self.timeout, context=context)
            else:
                smtp = smtplib.SMTP(self.smtp_host, self.smtp_port, timeout=self.timeout)
            with smtp:
                if self.security == "starttls":
                    smtp.starttls(context=context)
                if self.username:
                    secret = self.password.get_secret_value() if self.password else ""
                    smtp.login(self.username, secret)
                smtp.send_message(self._message(body, subject))
        except (OSError, smtplib.SMTPException) as exc:
            error = f"e-mail via {self.smtp_host}:{self.smtp_port} failed: {type(exc).__name__}: {exc}"
            if self._raise_on_failure:
                raise NotificationError(error) from None
            self.logger.error(error)

    async def anotify(self, body: str, subject: str | None = None) -> None:
        await asyncio.to_thread(self._send, body, subject)

    @async_dispatch(anotify)
    def notify(self, body: str, subject: str | None = None) -> None:  # type: ignore[override]
        self._send(body, subject)
