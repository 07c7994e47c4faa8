"""Fan-out and the resume log: how an event reaches every socket of a conversation, over Redis or in memory."""
