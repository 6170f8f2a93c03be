"""The grid container: a threaded WSGI server hosting SOAP services described by the hand-written WSDL."""
