"""WS-Resource framework subset shared by services: resource keys, properties, lifetimes, notification."""
