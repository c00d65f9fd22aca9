"""Build the reference corpus from music21's scores, or import a user's audio folder."""
