from sockwatch.cli import main

main()
