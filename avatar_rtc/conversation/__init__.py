"""The conversation: text and speech in, the avatar's speech out (sentences, TTS, turn-taking)."""
