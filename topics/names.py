"""Topic names of the mediator's wire contract.

Every topic the mediator reads or writes is derived from two prefixes, so several
deployments (or test runs) can share one cluster without seeing each other's traffic.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEFAULT_PREFIX", "DEFAULT_SERVICE_PREFIX", "Topics"]

DEFAULT_PREFIX = "mediator."
DEFAULT_SERVICE_PREFIX = "svc."


@dataclass(frozen=True, slots=True)
class Topics:
    """The names of every topic, derived from a mediator prefix and a service prefix.

    ``Topics()`` gives the defaults: ``mediator.requests``, ``mediator.replies``,
    ``mediator.results``, ``mediator.health``, ``mediator.dlq``, ``mediator.control``,
    ``mediator.alerts``, ``mediator.events`` and ``svc.<service>``.
    """

    prefix: str = DEFAULT_PREFIX
    service_prefix: str = DEFAULT_SERVICE_PREFIX

    @property
    def requests(self) -> str:
        """Clients publish `RequestEvent`s here (key: request id)."""
        return f"{self.prefix}requests"

    @property
    def replies(self) -> str:
        """Services publish `ReplyEvent`s here (key: workflow id)."""
        return f"{self.prefix}replies"

    @property
    def results(self) -> str:
        """The mediator publishes `ResultEvent`s here unless a request names `reply_to`."""
        return f"{self.prefix}results"

    @property
    def health(self) -> str:
        """Service instances publish `HealthEvent` heartbeats here (key: instance id)."""
        return f"{self.prefix}health"

    @property
    def dlq(self) -> str:
        """Messages that could not be parsed or validated land here as `DeadLetter`s."""
        return f"{self.prefix}dlq"

    @property
    def alerts(self) -> str:
        """The mediator publishes `AlertEvent`s here when an alert fires or resolves."""
        return f"{self.prefix}alerts"

    @property
    def events(self) -> str:
        """With `events.enabled`, the mediator publishes every run's and step's transition
        here as a `TransitionEvent` (key: workflow id)."""
        return f"{self.prefix}events"

    @property
    def control(self) -> str:
        """Operators publish `ControlEvent`s here (cancel, retry, reset a breaker)."""
        return f"{self.prefix}control"

    def service(self, service: str) -> str:
        """The inbox of a service: `CommandEvent`s for it are published here."""
        return f"{self.service_prefix}{service}"

    def mediator_topics(self) -> tuple[str, ...]:
        """The topics the mediator owns (created by `mediator dev` and the test fixtures)."""
        return (
            self.requests,
            self.replies,
            self.results,
            self.health,
            self.dlq,
            self.control,
            self.alerts,
            self.events,
        )
