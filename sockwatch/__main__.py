from sockwatch.entry import run

run()
