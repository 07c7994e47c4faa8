"""The Chorus app: teams, conversations, runs, the chat socket and the agent worker."""
