from lstmlab.cli import entry

if __name__ == "__main__":  # not when imported, e.g. as the main module of a spawned worker process
    entry()
