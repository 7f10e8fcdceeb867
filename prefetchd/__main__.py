from prefetchd.cli import main

raise SystemExit(main())
