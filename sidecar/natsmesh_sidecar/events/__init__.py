"""Events: publishing to JetStream and delivering durable subscriptions to the app."""
