"""`dsv3 up`: the platform's services as local processes, trained and served end to end."""
