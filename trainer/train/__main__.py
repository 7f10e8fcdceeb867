from trainer.train.train import main

raise SystemExit(main())
