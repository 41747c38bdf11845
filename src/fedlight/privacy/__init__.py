"""Privacy mechanisms: client-side and server-side update transforms plus the privacy spent."""
