"""The shop app the demo and the change tier run."""
