"""The waypoint: HBONE in, HTTP routing per request through nodeagent.traffic, HBONE out."""
