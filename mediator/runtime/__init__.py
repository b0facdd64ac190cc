"""The runtime: batches in (behind the error boundary), transitions committed, messages out
through the outbox. One replica is wired from these parts in `mediator.replica`."""
