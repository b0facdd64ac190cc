"""The runtime: batches in (behind the error boundary), transitions committed, messages out
through the outbox; and the wiring of one replica (`app`)."""
