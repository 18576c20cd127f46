"""The admin API in one package: its routes (`routes`), its request bodies (`requests`), the supervisor
that runs each conversion job in its own worker process (`supervisor`) and hot activation (`activation`)."""
